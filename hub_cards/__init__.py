"""Model-card templates and Hub export. Installed as `astrea.hub_cards`."""
