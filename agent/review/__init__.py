"""What a reviewer reads: the report, the --why story, replay, the HEPData export."""
