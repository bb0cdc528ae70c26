"""``python -m cifarlab`` is the ``cifarlab`` command."""

from cifarlab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
