"""`python -m demos.tour`: the tour's command line (see the package docstring)."""
from . import main

if __name__ == "__main__":
    raise SystemExit(main())
