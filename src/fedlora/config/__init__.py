"""One frozen :class:`~fedlora.config.run.RunConfig` per run: declared once (:mod:`.schema`), read from
flags and TOML files (:mod:`.file`), validated up front (:func:`~fedlora.config.run.validate`)."""
