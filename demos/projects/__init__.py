"""The tutorial's projects, made real: each one trains or steers with the library and is measured
before and after by a yardstick nobody here wrote. `python -m demos.projects` lists and runs them."""
