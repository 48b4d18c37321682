package dev.gemmaaot.chat.ui

import androidx.compose.foundation.layout.Arrangement
import androidx.compose.foundation.layout.Column
import androidx.compose.foundation.layout.fillMaxSize
import androidx.compose.foundation.layout.padding
import androidx.compose.foundation.text.selection.SelectionContainer
import androidx.compose.material3.Button
import androidx.compose.material3.CircularProgressIndicator
import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.Text
import androidx.compose.runtime.Composable
import androidx.compose.ui.Alignment
import androidx.compose.ui.Modifier
import androidx.compose.ui.text.font.FontFamily
import androidx.compose.ui.unit.dp
import dev.gemmaaot.chat.Screen

@Composable
fun LoadingScreen(title: String, detail: String?) = Centered {
    CircularProgressIndicator()
    Text(title, style = MaterialTheme.typography.titleMedium)
    if (detail != null) Text(detail, style = MaterialTheme.typography.bodySmall)
}

@Composable
fun NoModelScreen(s: Screen.NoModel, onRetry: () -> Unit) = Centered {
    Text("No model found", style = MaterialTheme.typography.headlineSmall)
    Text("Export the bundle on your computer and push it to this app's folder:")
    SelectionContainer {
        Text("python -m compile.export --target tflite --android-demo\n${s.adbCommand}",
             fontFamily = FontFamily.Monospace, style = MaterialTheme.typography.bodySmall)
    }
    Text("Looked in ${s.folder}", style = MaterialTheme.typography.bodySmall)
    Button(onClick = onRetry) { Text("Retry") }
}

@Composable
fun ProblemScreen(title: String, body: String, onRetry: () -> Unit) = Centered {
    Text(title, style = MaterialTheme.typography.headlineSmall)
    SelectionContainer { Text(body) }
    Button(onClick = onRetry) { Text("Retry") }
}

@Composable
private fun Centered(content: @Composable () -> Unit) = Column(
    Modifier.fillMaxSize().padding(24.dp),
    verticalArrangement = Arrangement.spacedBy(16.dp, Alignment.CenterVertically),
    horizontalAlignment = Alignment.CenterHorizontally,
) { content() }
