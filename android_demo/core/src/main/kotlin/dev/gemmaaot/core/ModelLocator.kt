package dev.gemmaaot.core

import java.io.File

/**
 * Finds the model the app should load: the `.litertlm` files in the app's model directories
 * (app-specific storage, where `adb push` puts them), the preferred file name first, then the
 * newest. No file at all is a state the app explains with the adb command to run.
 */
object ModelLocator {
    const val DEFAULT_NAME = "gemma3-270m-int8.litertlm"

    sealed class Found {
        data class Model(val file: File, val check: LitertlmFile.Check) : Found()
        data class NoModel(val searched: List<File>) : Found()
    }

    fun candidates(dirs: List<File>): List<File> = dirs
        .flatMap { d -> d.listFiles { f -> f.isFile && f.name.endsWith(".litertlm") }.orEmpty().toList() }
        .sortedWith(compareByDescending<File> { it.name == DEFAULT_NAME }.thenByDescending { it.lastModified() }
            .thenBy { it.name })

    /** The first candidate, checked; or NoModel listing where it looked. */
    fun find(dirs: List<File>, chosen: File? = null): Found {
        val file = chosen ?: candidates(dirs).firstOrNull() ?: return Found.NoModel(dirs)
        return Found.Model(file, LitertlmFile.check(file))
    }

    /** The adb command that puts [name] where the app looks ([dir] is its external files dir). */
    fun pushCommand(dir: String, name: String = DEFAULT_NAME) =
        "adb push $name $dir/$name"
}
