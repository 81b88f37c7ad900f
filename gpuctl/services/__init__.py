"""The use cases (submit, watch, jobs, instance, queue, deploy …), between the CLI and the gateways.

Services take gateways and settings, return plain data (models, dataclasses), raise gpuctl.errors, and
never print. Long-running ones report progress through callbacks the caller passes in.
"""
