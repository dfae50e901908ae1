"""The one exception type neuronscope raises for bad input: its message is a sentence for the user."""


class NeuronscopeError(ValueError):
    """A problem with what the user asked for (a path, a model, a neuron id, a value).

    The message names what was wrong and what would be accepted; the CLI prints it without a traceback.
    """
