/*
 * module.c -- the CPython binding of flanneld_py._engine: the Engine type (a Python object around
 * the C engine of loop.h), RouteTable (the loop's LPM table on its own, for tests) and the
 * module's constants. The only source that includes Python.h; engine.h describes the whole.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/socket.h>

#include "loop.h"

#define X_NAME(n) #n,
static const char *const ctr_names[N_CTR] = {COUNTER_LIST(X_NAME)};
static const char *const off_names[N_OFF] = {OFFLOAD_LIST(X_NAME)};
#undef X_NAME

/* ---- argument converters ---------------------------------------------------------------------- */

static int conv_u32(PyObject *o, void *out)
{
    unsigned long long x = PyLong_AsUnsignedLongLong(o);
    if (x == (unsigned long long)-1 && PyErr_Occurred())
        return 0;
    if (x > 0xffffffffULL) {
        PyErr_SetString(PyExc_ValueError, "an IPv4 address must fit in 32 bits");
        return 0;
    }
    *(uint32_t *)out = (uint32_t)x;
    return 1;
}

static int conv_plen(PyObject *o, void *out)
{
    long x = PyLong_AsLong(o);
    if (x == -1 && PyErr_Occurred())
        return 0;
    if (x < 0 || x > 32) {
        PyErr_Format(PyExc_ValueError, "prefix length %ld is not in 0..32", x);
        return 0;
    }
    *(unsigned *)out = (unsigned)x;
    return 1;
}

/* ---- Engine ----------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    Engine core; /* what the loop thread uses: never a Python object */
} EngineObject;

static void engine_shutdown(EngineObject *o)
{
    Engine *e = &o->core;
    if (e->state == ST_RUNNING) {
        e->state = ST_STOPPED; /* claimed: a concurrent stop() returns at once */
        Py_BEGIN_ALLOW_THREADS
        eng_join(e);
        Py_END_ALLOW_THREADS
        eng_release(e);
    }
    e->state = ST_STOPPED;
}

/* The exception for a failed eng_init()/eng_start(). */
static PyObject *eng_failure(int rc)
{
    if (rc == ENG_NOMEM)
        return PyErr_NoMemory();
    return PyErr_SetFromErrno(PyExc_OSError);
}

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"tun_fd",  "udp_fd",  "local_net", "local_prefixlen",
                             "local_addr", "port", "mtu", "vnet_hdr", "udp_gso", "udp_gro",
                             "tun_gso", "tun_uso", NULL};
    int tun_fd, udp_fd, port, mtu, vnet = 0, gso = 0, gro = 0, tun_gso = 0, tun_uso = 0;
    uint32_t net, addr;
    unsigned plen;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iiO&O&O&ii|$ppppp:Engine", kwlist, &tun_fd,
                                     &udp_fd, conv_u32, &net, conv_plen, &plen, conv_u32, &addr,
                                     &port, &mtu, &vnet, &gso, &gro, &tun_gso, &tun_uso))
        return NULL;
    if (tun_gso && !vnet) {
        PyErr_SetString(PyExc_ValueError, "tun_gso needs a TUN fd opened with vnet_hdr");
        return NULL;
    }
    if (tun_uso && !tun_gso) {
        PyErr_SetString(PyExc_ValueError, "tun_uso needs tun_gso");
        return NULL;
    }
    int fds[2] = {tun_fd, udp_fd};
    const char *names[2] = {"tun_fd", "udp_fd"};
    for (int i = 0; i < 2; i++) {
        int fl = fds[i] < 0 ? -1 : fcntl(fds[i], F_GETFL);
        if (fl < 0) {
            PyErr_Format(PyExc_ValueError, "%s %d is not an open file descriptor", names[i],
                         fds[i]);
            return NULL;
        }
        if (!(fl & O_NONBLOCK)) {
            PyErr_Format(PyExc_ValueError, "%s %d must be non-blocking", names[i], fds[i]);
            return NULL;
        }
    }
    if (port < 1 || port > 65535) {
        PyErr_Format(PyExc_ValueError, "UDP port %d is not in 1..65535", port);
        return NULL;
    }
    if (mtu < 68 || mtu > 65535) {
        PyErr_Format(PyExc_ValueError, "MTU %d is not in 68..65535", mtu);
        return NULL;
    }
    EngineObject *o = (EngineObject *)type->tp_alloc(type, 0);
    if (!o)
        return NULL;
    eng_config c = {
        .tun_fd = tun_fd,
        .udp_fd = udp_fd,
        .local_net = net,
        .local_addr = addr,
        .local_prefixlen = plen,
        .port = (uint16_t)port,
        .mtu = (uint32_t)mtu,
        .vnet_hdr = vnet,
        .udp_gso = gso,
        .udp_gro = gro,
        .tun_gso = tun_gso,
        .tun_uso = tun_uso,
    };
    int rc = eng_init(&o->core, &c);
    if (rc != ENG_OK) {
        eng_failure(rc);
        Py_DECREF(o);
        return NULL;
    }
    return (PyObject *)o;
}

static void Engine_dealloc(EngineObject *o)
{
    engine_shutdown(o);
    eng_destroy(&o->core);
    Py_TYPE(o)->tp_free((PyObject *)o);
}

static PyObject *Engine_start(EngineObject *o, PyObject *Py_UNUSED(ignored))
{
    Engine *e = &o->core;
    if (e->state != ST_NEW) {
        PyErr_SetString(PyExc_RuntimeError, e->state == ST_RUNNING
                                                ? "engine cannot start: it is running"
                                                : "engine cannot start: it is stopped");
        return NULL;
    }
    int rc = eng_start(e);
    if (rc != ENG_OK)
        return eng_failure(rc);
    Py_RETURN_NONE;
}

static PyObject *Engine_stop(EngineObject *o, PyObject *Py_UNUSED(ignored))
{
    engine_shutdown(o);
    Py_RETURN_NONE;
}

static PyObject *engine_command(EngineObject *o, struct eng_cmd *c)
{
    Engine *e = &o->core;
    int rc = 1;
    if (e->started) { /* the loop owns the table until it has exited */
        Py_BEGIN_ALLOW_THREADS
        rc = eng_send_cmd(e, c);
        Py_END_ALLOW_THREADS
        if (rc < 0)
            return PyErr_SetFromErrno(PyExc_OSError);
    }
    /* no loop thread (never started, or exited): the table is ours */
    if (rc == 1 && eng_apply_cmd(e, c) < 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *Engine_set_route(EngineObject *o, PyObject *args)
{
    struct eng_cmd c = {.op = CMD_SET};
    int partial = 0;
    if (!PyArg_ParseTuple(args, "O&O&O&|p:set_route", conv_u32, &c.net, conv_plen, &c.plen,
                          conv_u32, &c.peer, &partial))
        return NULL;
    c.flags = partial ? RT_PEER_PARTIAL_CSUM : 0;
    return engine_command(o, &c);
}

static PyObject *Engine_del_route(EngineObject *o, PyObject *args)
{
    struct eng_cmd c = {.op = CMD_DEL};
    if (!PyArg_ParseTuple(args, "O&O&:del_route", conv_u32, &c.net, conv_plen, &c.plen))
        return NULL;
    return engine_command(o, &c);
}

static PyObject *Engine_set_icmp_ratelimit(EngineObject *o, PyObject *args)
{
    long long burst, per_sec;
    if (!PyArg_ParseTuple(args, "LL:set_icmp_ratelimit", &burst, &per_sec))
        return NULL;
    if (burst < 0 || burst > INT32_MAX || per_sec < 0 || per_sec > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "ICMP burst and rate must be in 0..2147483647");
        return NULL;
    }
    if (o->core.state != ST_NEW) { /* once started, the bucket is the loop's */
        PyErr_SetString(PyExc_RuntimeError, "the ICMP rate limit can only be set before start()");
        return NULL;
    }
    eng_set_icmp_ratelimit(&o->core, (uint32_t)burst, (uint32_t)per_sec);
    Py_RETURN_NONE;
}

/* {names[i]: values[i]} */
static PyObject *counter_dict(const char *const *names, const uint64_t *values, int n)
{
    PyObject *d = PyDict_New();
    if (!d)
        return NULL;
    for (int i = 0; i < n; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(values[i]);
        if (!v || PyDict_SetItemString(d, names[i], v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(v);
    }
    return d;
}

static PyObject *Engine_stats(EngineObject *o, PyObject *Py_UNUSED(ignored))
{
    uint64_t snap[N_CTR];
    eng_stats(&o->core, snap);
    return counter_dict(ctr_names, snap, N_CTR);
}

static PyObject *Engine_offloads(EngineObject *o, PyObject *Py_UNUSED(ignored))
{
    uint64_t snap[N_OFF];
    eng_offloads(&o->core, snap);
    return counter_dict(off_names, snap, N_OFF);
}

static PyObject *Engine_peer_stats(EngineObject *o, PyObject *Py_UNUSED(ignored))
{
    Engine *e = &o->core;
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    uint32_t n = pc_count(e);
    for (uint32_t i = 0; i < n; i++) {
        peer_ctr p;
        if (!pc_read(e, i, &p))
            continue;
        PyObject *t = Py_BuildValue("(kIkKKKK)", (unsigned long)p.net, (unsigned)p.plen,
                                    (unsigned long)p.peer, (unsigned long long)p.c[PC_TX_PACKETS],
                                    (unsigned long long)p.c[PC_TX_BYTES],
                                    (unsigned long long)p.c[PC_RX_PACKETS],
                                    (unsigned long long)p.c[PC_RX_BYTES]);
        if (!t || PyList_Append(out, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(t);
    }
    return out;
}

static PyObject *Engine_alive(EngineObject *o, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(o->core.state == ST_RUNNING && !eng_exited(&o->core));
}

static PyObject *Engine_error(EngineObject *o, PyObject *Py_UNUSED(ignored))
{
    Engine *e = &o->core;
    if (!e->started || !eng_exited(e) || !e->error_what)
        Py_RETURN_NONE;
    if (e->error_errno)
        return PyUnicode_FromFormat("%s: %s", e->error_what, strerror(e->error_errno));
    return PyUnicode_FromString(e->error_what);
}

static PyMethodDef Engine_methods[] = {
    {"start", (PyCFunction)Engine_start, METH_NOARGS, "Start the loop thread."},
    {"stop", (PyCFunction)Engine_stop, METH_NOARGS,
     "Stop the loop and join its thread (idempotent); the fds stay open."},
    {"set_route", (PyCFunction)Engine_set_route, METH_VARARGS,
     "set_route(net, prefixlen, peer, partial_csum=False): add or replace a route (host-order "
     "ints); partial_csum: the peer completes TCP/UDP checksums left partial."},
    {"del_route", (PyCFunction)Engine_del_route, METH_VARARGS,
     "del_route(net, prefixlen): remove a route (no-op when absent)."},
    {"set_icmp_ratelimit", (PyCFunction)Engine_set_icmp_ratelimit, METH_VARARGS,
     "set_icmp_ratelimit(burst, per_sec): before start(), replace the ICMP error token bucket "
     "(default ICMP_MSGS_BURST, ICMP_MSGS_PER_SEC; it starts full). per_sec 0: no refill."},
    {"stats", (PyCFunction)Engine_stats, METH_NOARGS, "Counters as a dict."},
    {"offloads", (PyCFunction)Engine_offloads, METH_NOARGS,
     "Offload state (vnet_hdr, udp_gso, udp_gro, tun_gso: 0/1, as in effect now) and offload "
     "counters, as a dict."},
    {"peer_stats", (PyCFunction)Engine_peer_stats, METH_NOARGS,
     "peer_stats() -> [(net, prefixlen, peer, tx_packets, tx_bytes, rx_packets, rx_bytes)]: "
     "one tuple per route, counted since it was set or its peer changed."},
    {"alive", (PyCFunction)Engine_alive, METH_NOARGS, "Whether the loop thread is running."},
    {"error", (PyCFunction)Engine_error, METH_NOARGS,
     "Why the loop stopped on its own, or None."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "flanneld_py._engine.Engine",
    .tp_basicsize = sizeof(EngineObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Engine(tun_fd, udp_fd, local_net, local_prefixlen, local_addr, port, mtu, *, "
              "vnet_hdr=False, udp_gso=False, udp_gro=False, tun_gso=False)",
    .tp_new = Engine_new,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
};

/* ---- RouteTable: the loop's table, exported so tests can hold it against routes.py ------------ */

typedef struct {
    PyObject_HEAD
    rt_table rt;
} RouteTableObject;

static PyObject *RouteTable_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    if (!PyArg_ParseTuple(args, ":RouteTable") || (kw && PyDict_Size(kw))) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "RouteTable() takes no arguments");
        return NULL;
    }
    RouteTableObject *t = (RouteTableObject *)type->tp_alloc(type, 0);
    if (!t)
        return NULL;
    if (rt_init(&t->rt) < 0) {
        Py_DECREF(t);
        return PyErr_NoMemory();
    }
    return (PyObject *)t;
}

static void RouteTable_dealloc(RouteTableObject *t)
{
    rt_free(&t->rt);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static PyObject *RouteTable_insert(RouteTableObject *t, PyObject *args)
{
    uint32_t net, peer;
    unsigned plen;
    if (!PyArg_ParseTuple(args, "O&O&O&:insert", conv_u32, &net, conv_plen, &plen, conv_u32,
                          &peer))
        return NULL;
    if (rt_insert(&t->rt, net, plen, peer, 0, RT_NO_PC) < 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *RouteTable_remove(RouteTableObject *t, PyObject *args)
{
    uint32_t net;
    unsigned plen;
    if (!PyArg_ParseTuple(args, "O&O&:remove", conv_u32, &net, conv_plen, &plen))
        return NULL;
    return PyBool_FromLong(rt_remove(&t->rt, net, plen));
}

static PyObject *RouteTable_lookup(RouteTableObject *t, PyObject *arg)
{
    uint32_t addr;
    if (!conv_u32(arg, &addr))
        return NULL;
    const rt_slot *s = rt_lookup(&t->rt, addr);
    if (!s)
        Py_RETURN_NONE;
    return Py_BuildValue("(kIk)", (unsigned long)s->net, (unsigned)s->plen, (unsigned long)s->peer);
}

static Py_ssize_t RouteTable_len(RouteTableObject *t) { return (Py_ssize_t)t->rt.count; }

static PyMethodDef RouteTable_methods[] = {
    {"insert", (PyCFunction)RouteTable_insert, METH_VARARGS,
     "insert(net, prefixlen, peer): add or replace."},
    {"remove", (PyCFunction)RouteTable_remove, METH_VARARGS,
     "remove(net, prefixlen) -> bool."},
    {"lookup", (PyCFunction)RouteTable_lookup, METH_O,
     "lookup(addr) -> (net, prefixlen, peer) of the longest match, or None."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods RouteTable_as_sequence = {.sq_length = (lenfunc)RouteTable_len};

static PyTypeObject RouteTableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "flanneld_py._engine.RouteTable",
    .tp_basicsize = sizeof(RouteTableObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The engine's longest-prefix-match table (host-order int addresses).",
    .tp_new = RouteTable_new,
    .tp_dealloc = (destructor)RouteTable_dealloc,
    .tp_methods = RouteTable_methods,
    .tp_as_sequence = &RouteTable_as_sequence,
};

/* ---- the module ------------------------------------------------------------------------------- */

static struct PyModuleDef engine_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "flanneld_py._engine",
    .m_doc = "flanneld-py data-plane engine (C): Engine and RouteTable.",
    .m_size = -1,
};

/* Add names[0..n) to m as a tuple of str called `attr`; -1 on error. */
static int add_names(PyObject *m, const char *attr, const char *const *names, int n)
{
    PyObject *t = PyTuple_New(n);
    if (!t)
        return -1;
    for (int i = 0; i < n; i++) {
        PyObject *s = PyUnicode_FromString(names[i]);
        if (!s) {
            Py_DECREF(t);
            return -1;
        }
        PyTuple_SET_ITEM(t, i, s);
    }
    if (PyModule_AddObject(m, attr, t) < 0) {
        Py_DECREF(t);
        return -1;
    }
    return 0;
}

PyMODINIT_FUNC PyInit__engine(void)
{
    if (PyType_Ready(&EngineType) < 0 || PyType_Ready(&RouteTableType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&engine_module);
    if (!m)
        return NULL;
    if (add_names(m, "COUNTERS", ctr_names, N_CTR) < 0)
        goto fail;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(&EngineType);
        goto fail;
    }
    Py_INCREF(&RouteTableType);
    if (PyModule_AddObject(m, "RouteTable", (PyObject *)&RouteTableType) < 0) {
        Py_DECREF(&RouteTableType);
        goto fail;
    }
    if (add_names(m, "OFFLOAD_COUNTERS", off_names, N_OFF) < 0)
        goto fail;
    if (PyModule_AddIntConstant(m, "BATCH", BATCH) < 0 ||
        PyModule_AddIntConstant(m, "BUFFER_SIZE", BUFSZ) < 0 ||
        PyModule_AddIntConstant(m, "MAX_SEGMENTS", MAX_SEGS) < 0 ||
        PyModule_AddIntConstant(m, "PEER_SLOTS", PEER_SLOTS) < 0 ||
        PyModule_AddIntConstant(m, "VNET_HDR_LEN", VNET_LEN) < 0 ||
        PyModule_AddIntConstant(m, "ICMP_MSGS_BURST", ICMP_MSGS_BURST) < 0 ||
        PyModule_AddIntConstant(m, "ICMP_MSGS_PER_SEC", ICMP_MSGS_PER_SEC) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
