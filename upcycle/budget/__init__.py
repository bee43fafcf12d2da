"""Budget control: selection biases that set the mean number of FFN experts per token (calibration, training)."""
