"""What a user may pass in and how it is checked: option definitions, parsers, limits, the strict engine-spec model and the management API's flag allow-list."""
