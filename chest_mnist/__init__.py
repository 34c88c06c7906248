"""ResNet-18 on MedMNIST's ChestMNIST with PyTorch Lightning, Hydra, torchmetrics and TensorBoard."""


class UserError(Exception):
    """Bad input from the user (a file, a path, a config value).

    The message names the file or key, says what is wrong and what to do next. The command
    line entry points print it without a traceback and exit non-zero.
    """
