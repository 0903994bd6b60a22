"""The errors loopkit raises where a user's input is wrong. Each message names the problem
and the fix."""


class StepError(RuntimeError):
    """A step failed on a batch: the message names the step, the batch's shapes and the cause."""


class LossError(ValueError):
    """``loss_fn`` returned something that is not a scalar floating-point loss."""


class CompileError(RuntimeError):
    """``torch.compile`` could not compile the step as one graph; the message says why."""
