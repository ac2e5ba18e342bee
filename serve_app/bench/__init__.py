"""The benchmark tool: `serve-app-bench --help`."""
