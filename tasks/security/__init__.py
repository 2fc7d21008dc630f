"""Security-breach tasks: evidence, assessments and the containment primitives."""
