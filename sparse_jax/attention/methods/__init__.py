"""Built-in sparse attention methods; importing this package registers them."""
