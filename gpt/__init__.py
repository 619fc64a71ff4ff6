"""Everything that speaks to the model: prompt building, reply generation, plain text."""
