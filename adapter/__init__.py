"""The adapter daemon that runs on the GPU instance: SQS → ComfyUI (or the unified API) → S3 → DynamoDB.

Modules: ``__main__`` (entry point, signals), ``settings`` (AdapterSettings), ``loop`` (long poll, job
slots, shutdown), ``handlers`` (one message: claim, run, publish, fail/release), ``heartbeat`` (visibility,
heartbeat and progress writes, cancel detection), ``backends`` (ComfyUI native, unified API), ``workflow``
(templates and filling), ``inputs`` (fetching input images safely), ``hygiene`` (deleting each job's files on
the ComfyUI box), ``errors`` (failure classes).
"""
