"""`nanoflow tune`: profiles a model's layer ops on this device (`profile`), chooses a nano-batch
pipeline per token bucket from the profile (`search`, a MILP solved by HiGHS) and caches it where
`--pipeline auto` finds it (`cli`)."""
