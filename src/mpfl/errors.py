"""Exceptions raised by mpfl; each message says what was wrong and what to do about it."""



class MpflError(Exception):
    """Base class of every error mpfl raises on purpose."""


class ConfigError(MpflError, ValueError):
    """A configuration value, file or flag is unknown, malformed or out of range."""


class DataError(MpflError):
    """A dataset file is missing, truncated, corrupt or of the wrong format."""


class ModelError(MpflError):
    """A model name is unknown or a weight file does not fit the model."""


class PayloadError(MpflError, ValueError):
    """A message body failed validation: wrong magic, kind, round, length, checksum or values."""


class RoundError(MpflError):
    """A round could not complete: fewer than `min_nodes` nodes gave a valid reply."""


class ExportError(MpflError):
    """A run directory cannot be exported, or an export directory cannot be loaded."""


class ResourceError(MpflError):
    """A run would need more memory (or other resources) than the machine has."""


class PathError(MpflError):
    """A path cannot be used safely: a symbolic link where a file is written, a file where a folder is needed."""


class MethodError(MpflError):
    """A method, criterion, consensus rule or aggregator (built in or a plug-in) breaks its contract: a
    hook its plan needs is missing, or a hook returned something other than what the server expects."""


class RunDirError(MpflError, ValueError):
    """A run directory cannot be continued: a file is damaged, belongs to another run, does not match the
    run's config, or another process is using the directory."""


class WorkerError(MpflError):
    """A worker process of the simulator stopped without answering: killed (out of memory?), or it
    could not start (a script that starts workers without a ``__main__`` guard)."""


WORKER_NOTE = "raised in worker process"
"""How the note of an error raised in a worker process begins: the worker's traceback follows it."""
