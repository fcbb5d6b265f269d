"""The configuration error every layer raises (config, registry, sweep, launchers)."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""
