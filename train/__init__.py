"""Training: data, losses, phases 1-3 (tokenizer + joint AR, pretokenize, AR), presets, metrics.

Imports only the model core (`prologue_export`) and the runtime; the CLI (`prologue train`,
`prologue eval`) drives it."""
