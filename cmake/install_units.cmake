# Installs the systemd units from dist/ with ExecStart pointing at the installed binaries.
# Runs at install time (make install, CPack), when CMAKE_INSTALL_PREFIX is the prefix the
# files go to (/usr for the .deb), so one unit source serves both. Needs PORTMUX_DIST and
# PORTMUX_BINDIR (relative to the prefix) set by the install(CODE) before it.
set(unit_dir "$ENV{DESTDIR}${CMAKE_INSTALL_PREFIX}/lib/systemd/system")
file(MAKE_DIRECTORY "${unit_dir}")
foreach(unit portmux-server.service portmux-client.service)
  file(READ "${PORTMUX_DIST}/${unit}" text)
  string(REPLACE "/usr/local/bin/" "${CMAKE_INSTALL_PREFIX}/${PORTMUX_BINDIR}/" text "${text}")
  message(STATUS "Installing: ${unit_dir}/${unit}")
  file(WRITE "${unit_dir}/${unit}" "${text}")
endforeach()
