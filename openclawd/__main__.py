from openclawd.cli import main

raise SystemExit(main())
