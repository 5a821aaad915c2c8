import sys

from flanneld_py.cli import entry

sys.exit(entry())
