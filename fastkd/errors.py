"""fastkd's exceptions: one hierarchy with :class:`FastKDError` at the root.

Every exception class fastkd defines derives from :class:`FastKDError` and, where that is the
kind of problem, from ``ValueError`` (bad input) or ``RuntimeError`` (the machine cannot do it), so
``except ValueError`` keeps working for callers that expect the built-in kind. The command line
catches :class:`FastKDError` once, prints its message on one line and exits with status 2.

=============================  ============================  ========================================
class                          kind                          raised when
=============================  ============================  ========================================
:class:`DataError`             ``ValueError``                a data source is missing, unreadable,
                                                             empty or malformed
:class:`ConfigError`           ``ValueError``                a distillation option, input or
                                                             checkpoint is wrong (``DistillError``)
:class:`OptionError`           ``ValueError``                a method option is unknown or invalid
:class:`StudentConfigError`    ``ValueError``                the student's shape does not fit
:class:`ModelError`            ``ValueError``                a model or tokenizer cannot be loaded
:class:`TeacherError`          ``ValueError``                teacher fine-tuning got bad input
:class:`CheckpointError`       ``ValueError``                a checkpoint is missing, corrupt or
                                                             belongs to another run
:class:`AssetError`            ``RuntimeError``              an offline asset cannot be obtained
:class:`BackendUnavailableError` ``RuntimeError``            a backend named by the user cannot run
:class:`DemoError`             ``RuntimeError``              the demo cannot run
:class:`TrainingDivergedError` ``RuntimeError``              the loss or gradients became non-finite
=============================  ============================  ========================================
"""

from __future__ import annotations

__all__ = [
    "AssetError",
    "BackendUnavailableError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DemoError",
    "DistillError",
    "FastKDError",
    "ModelError",
    "OptionError",
    "StudentConfigError",
    "TeacherError",
    "TrainingDivergedError",
]


class FastKDError(Exception):
    """The root of every exception fastkd raises on purpose (bad input, missing asset, ...)."""


class ConfigError(FastKDError, ValueError):
    """A configuration, input or checkpoint problem found before (or instead of) training."""


DistillError = ConfigError  # the name the loop and its users know


class DataError(FastKDError, ValueError):
    """A data source is missing, unreadable, empty or malformed."""


class OptionError(FastKDError, ValueError):
    """An unknown or invalid method option."""


class StudentConfigError(FastKDError, ValueError):
    """The requested student shape does not fit the teacher."""


class ModelError(ConfigError):
    """A model or tokenizer cannot be loaded, or is not the kind of model the command needs."""


class TeacherError(FastKDError, ValueError):
    """Bad input to the teacher fine-tuning (unreadable model or data, empty data, bad labels)."""


class CheckpointError(ConfigError):
    """A checkpoint is missing, corrupt, or was written by a different configuration."""


class AssetError(FastKDError, RuntimeError):
    """An offline asset could not be obtained or parsed; the message says what failed and what to do."""


class BackendUnavailableError(FastKDError, RuntimeError):
    """A backend was asked for by name and cannot run here (or not on these inputs)."""


class DemoError(FastKDError, RuntimeError):
    """The demo cannot run (a missing asset, a failed step)."""


class TrainingDivergedError(FastKDError, RuntimeError):
    """The loss or the gradients became NaN or infinite; the message names the step."""
