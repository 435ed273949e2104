"""Channel dependency analysis: channel maps, op handlers, groups."""
