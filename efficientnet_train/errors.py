"""The one exception type whose message is meant for the buyer."""


class JobError(Exception):
    """A problem the buyer can fix: bad data, a bad hyperparameter, a missing channel.

    Its message becomes the job's FailureReason, so it must say what is wrong,
    where (file, channel or hyperparameter) and how to fix it.
    """
