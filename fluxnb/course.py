"""``python -m fluxnb.course OUT [--envelope colab-t4]``: the course runner's command, kept where the docs
and every committed result name it. The runner itself is :mod:`fluxnb.lab.course`."""

import sys

from fluxnb.lab.course import main

if __name__ == "__main__":
    sys.exit(main())
