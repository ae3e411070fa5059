"""`python tools/profile.py PROFILE [--data D] [--name N] [-S X]...`, as docs/results.md's older commands call it:
the same as `cxr run --profile PROFILE ...` (cxr.jobs.experiment)."""

import sys

from cxr.__main__ import main

if __name__ == "__main__":
    sys.argv = ["cxr", "run", "--profile", *sys.argv[1:]]
    main()
