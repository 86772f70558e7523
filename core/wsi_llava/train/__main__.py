"""``python -m wsi_llava.train``: the ``train`` command group, for ``torchrun`` / ``accelerate launch -m``."""

from wsi_llava.train.command import train_command

if __name__ == "__main__":
    train_command(prog_name="wsi-llava train")
