"""Built-in backends. Each module is a plugin that registers its backend through the public
``register_backends`` hook, exactly as a third-party plugin would."""
