from bbdrop.cli import main

raise SystemExit(main())
