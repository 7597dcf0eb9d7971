"""Training of the detail generator (plain module: no Kedro)."""
