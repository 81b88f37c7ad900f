"""One typed gateway per AWS service, all built from :func:`gpuctl.aws._session.make_clients`.

Gateways return gpuctl's models and raise :mod:`gpuctl.errors`; nothing above them sees a ClientError.
"""
