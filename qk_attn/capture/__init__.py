"""Inside the attention call: the "qk_sniff" function, its hooks, one forward's facts, selection and gather."""
