"""Data: finding, checking and splitting the Cats-vs-Dogs images."""
