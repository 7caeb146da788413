"""Reports: tables and plots built from formats, energy estimates and sweep results."""
