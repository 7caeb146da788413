"""Imported first by the sweep's fork server (its preload, dse/sweep/executors.py): Ctrl-C is the
sweep's to handle (it stops its workers and says so in one line), and CPython's fork server ignores
SIGINT only once its preload is imported, so a Ctrl-C in the seconds the server spends importing the
trainer printed the server's own KeyboardInterrupt traceback under the sweep's line."""

import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)
