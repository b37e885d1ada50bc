from vaepatch.cli import main

raise SystemExit(main())
