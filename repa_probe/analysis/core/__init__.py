"""The shared core of every analysis: typed options, the one input resolver (checkpoints, data, VAE,
encoder), the run skeleton, the file writers, feature capture, encoder targets and the figure style."""
