"""`python -m lightning_vgg` entry point; the same as the `lightning-vgg` script."""

from lightning_vgg.cli import main

if __name__ == "__main__":
    main()
