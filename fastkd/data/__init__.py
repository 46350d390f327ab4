"""Multi-view data pipelines (DALI and plain PyTorch), dataset handling and the sample dataset."""
