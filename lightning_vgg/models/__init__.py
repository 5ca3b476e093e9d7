"""Models: the plain VGG16 network and the LightningModule that trains it."""
