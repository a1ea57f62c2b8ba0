"""The process around training: the launcher's environment and process groups (distributed.py), signals and
preemption (signals.py), exiting without hanging (process_exit.py), the run-directory lock (run_lock.py)."""
