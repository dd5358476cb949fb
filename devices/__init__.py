"""Device profiles, one TOML file each; read them with `edgelora.profiles` (installed as edgelora.devices)."""
