"""The pool: jobs moving between processes through the task directory (job schemas, folder
protocol, job runner, heartbeat, worker process, supervisor, lock server)."""
