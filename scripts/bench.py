#!/usr/bin/env python
"""Thin wrapper: the same as the `serve-app-bench` console command."""

import sys

from serve_app.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
