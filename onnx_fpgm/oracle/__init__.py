"""The oracle: the pruned model against the masked original, at sizes chosen for symbolic dims."""
