"""One objective per module; each returns a scalar loss from the model's feature dict."""
