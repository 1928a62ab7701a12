"""What every run stands on: the audit log, executor, event pass, run lock and path safety."""
