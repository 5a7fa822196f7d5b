"""The OpenAI-compatible HTTP API (docs/http.md), served from the task directory.

An HTTP job is a task-directory job: the upload streams into tmp/ and is renamed into inbox/, a worker
(pool or lock mode) runs it, and the API reads the outcome from done/ or failed/. Nothing here touches
the model. Needs the `http` extra (FastAPI, uvicorn, python-multipart).
"""
