"""The memory model: one small pure function per component, each returning bytes.

Every function takes plain numbers (or an Architecture and a Plan) and says in its
docstring what it counts and why. ``peak.py`` assembles them into the phases of a
training step; ``vramplan.stacks`` decides which functions a given trainer uses.
"""
